//! Choosing and connecting to backends. Each shard owns its own
//! [`Balancer`]s: no state is shared between shards.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;
use smallvec::SmallVec;

use crate::config::{Balance, Upstream, WeightedBackend};
use crate::metrics::ShardMetrics;

/// A plan: backends' indexes in the order to try them.
type Order = SmallVec<[usize; 8]>;

pub mod conn;
pub mod health;
pub mod pool;
pub mod proxy_out;

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
    /// ktern itself is out of a resource (file descriptors, memory,
    /// buffers): a local error, not the backend's; the backend is not
    /// marked down for it.
    #[error("local resources exhausted connecting to {addr}: {source}")]
    Local {
        /// The backend being connected to.
        addr: SocketAddr,
        /// The OS error (EMFILE, ENFILE, ENOBUFS, ENOMEM).
        source: io::Error,
    },
    /// Every backend of the group had `max_conns` connections in use: none
    /// was tried.
    #[error("every backend is at its max_conns ({backends} backends)")]
    Full {
        /// Backends skipped for it.
        backends: usize,
    },
    /// The PROXY header (`send_proxy`) could not be written to the new
    /// backend connection.
    #[error("cannot send the PROXY header to {addr}: {source}")]
    ProxyHeader {
        /// The backend.
        addr: SocketAddr,
        /// The write's error.
        source: io::Error,
    },
}

impl UpstreamError {
    /// The counter this failure is counted in.
    pub fn counter<'m>(&self, m: &'m ShardMetrics) -> &'m AtomicU64 {
        match self {
            UpstreamError::Local { .. } => &m.local_exhaustion,
            UpstreamError::Full { .. } => &m.upstream_full,
            _ => &m.upstream_connect_failures,
        }
    }
}

impl Balancer {
    /// Logs a failed connect (every backend tried) for `peer`, on `route`
    /// (`"http"`, `"tcp"`, `"passthrough"`): at most one line per 10 s per
    /// shard with how many since, the others at debug. While the group is
    /// down each request fails so, and any client can send requests.
    pub fn log_connect_failure(&self, peer: std::net::SocketAddr, route: &str, e: &UpstreamError) {
        match self.connect_log.due() {
            Some(count) => {
                tracing::warn!(%peer, route, error = %e, count, "upstream connect failed ({count} since the last such line; at most one line per 10 s, the others at debug)")
            }
            None => tracing::debug!(%peer, route, error = %e, "upstream connect failed"),
        }
    }

    /// Logs a backend's failure on a request or connection of `peer`
    /// (`what` failed, with `error`): as [`Balancer::log_connect_failure`],
    /// one line per 10 s per shard with how many since, the others at
    /// debug. A backend whose certificate expired, or that answers
    /// garbage, fails each request so (one marked down is still tried once
    /// per request).
    pub fn log_failure(
        &self,
        peer: std::net::SocketAddr,
        backend: std::net::SocketAddr,
        what: &str,
        error: &dyn std::fmt::Display,
    ) {
        match self.failure_log.due() {
            Some(count) => {
                tracing::warn!(%peer, %backend, error = %error, count, "{what} ({count} since the last such line; at most one line per 10 s, the others at debug)")
            }
            None => tracing::debug!(%peer, %backend, error = %error, "{what}"),
        }
    }
}

/// Errors that say this process, not the peer, ran out of something.
pub fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// No local port left towards one address (`EADDRNOTAVAIL` from
/// `connect`: the ephemeral range spent, most of it in TIME_WAIT, see
/// tuning.md). Ours, not the backend's, but only towards that address:
/// another backend may still have ports. (The same error says the host
/// has no source address for the backend's family, an IPv6 backend
/// without a routable IPv6 address: ours too, and it fails at once.)
pub fn is_out_of_ports(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
}

/// nginx's defaults: one failure takes a backend out for 10 s.
pub const DEFAULT_MAX_FAILS: u32 = 1;
/// See [`DEFAULT_MAX_FAILS`].
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);

/// Ring points per unit of weight for consistent hashing: with 160 per
/// backend (ketama's figure) the load spread is within a few percent, and a
/// backend leaving moves only its own share of keys.
const RING_POINTS: u32 = 160;

#[derive(Debug)]
struct Backend {
    addr: SocketAddr,
    weight: u32,
    /// Consecutive failures.
    fails: Cell<u32>,
    /// Skipped until then (passive health).
    down_until: Cell<Option<Instant>>,
    /// Requests or connections in flight on this shard (least_conn).
    active: Cell<u32>,
    /// Connections in use at once, process-wide (0: no cap).
    max_conns: u32,
    /// Smooth weighted round robin state (nginx's `current_weight`).
    current: Cell<i64>,
}

/// Picks backends for one upstream group or `tcp` route, per shard.
///
/// Policies: smooth weighted round robin (nginx's), least connections per
/// weight, or consistent hashing on a key. Health: a backend that failed
/// `max_fails` times in a row (passive), or that active checks marked
/// down, is tried last, and one such per request: still tried when every
/// backend is down, rather than failing outright, but not every one of
/// them. A failed connect moves to the next backend.
#[derive(Debug)]
pub struct Balancer {
    backends: Vec<Backend>,
    balance: Balance,
    /// Consistent-hash ring: (point, backend index), sorted by point.
    ring: Vec<(u64, usize)>,
    /// Rotation start (tie-breaks), different per shard so shards do not
    /// all begin with the same backend.
    next: Cell<usize>,
    max_fails: u32,
    fail_timeout: Duration,
    health: Option<Arc<HealthState>>,
    /// Process-wide connections in use per backend, where one has
    /// `max_conns`.
    in_use: Option<Arc<InUse>>,
    /// Refusals at `max_conns`, logged at most once per 10 s per shard.
    pub full_log: crate::clock::LogEvery,
    /// Failed connects (every backend tried), logged at most once per
    /// 10 s per shard: while the group is down each request fails so, and
    /// any client can send requests.
    pub connect_log: crate::clock::LogEvery,
    /// A backend's other failures (its TLS handshake, a write, a response
    /// ktern cannot use): at most one line per 10 s per shard, for the
    /// same reason.
    pub failure_log: crate::clock::LogEvery,
}

/// Connections in use per backend of one upstream group, for
/// `max_conns`: one count per backend for the whole process, shared by
/// every shard's balancer, so the cap is the backend's total (nginx counts
/// per worker unless the group has a shared-memory zone). Idle pooled
/// connections are not in use.
#[derive(Debug)]
pub struct InUse {
    /// By backend index; shared with the group's earlier generations,
    /// whose connections still count (see [`in_use_counts`]).
    counts: Box<[Arc<AtomicU32>]>,
}

impl InUse {
    /// `n` backends, none in use (the shards' counts come from
    /// `in_use_counts`, which carries them across reloads).
    #[cfg(test)]
    fn new(n: usize) -> InUse {
        InUse {
            counts: (0..n).map(|_| Arc::default()).collect(),
        }
    }

    /// Takes a connection slot on backend `i`, if it has fewer than `max`
    /// in use (atomically: two shards cannot both take the last one).
    fn take(&self, i: usize, max: u32) -> Option<&AtomicU32> {
        debug_assert!(
            i < self.counts.len(),
            "counts out of step with the backends"
        );
        let c = self.counts.get(i)?;
        c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()?;
        Some(c)
    }

    /// Backend `i`'s connections in use now.
    pub fn get(&self, i: usize) -> u32 {
        self.counts.get(i).map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// The in-use counts of each group of `upstreams` with a capped backend
/// (`None` for the others), given the groups `before` a reload and their
/// `counts` (both empty at start). A reload keeps each backend's count
/// while the backend (by address) stays in a group of the same name,
/// whatever else changed (its cap too: the next lease is checked against
/// the new one), so the connections in use under the old configuration
/// still count; a backend new to the group starts at 0. A group with no
/// cap before counts from the reload on.
pub fn in_use_counts(
    upstreams: &[Upstream],
    before: &[Upstream],
    counts: &[Option<Arc<InUse>>],
) -> Vec<Option<Arc<InUse>>> {
    upstreams
        .iter()
        .map(|u| {
            if u.backends.iter().all(|b| b.max_conns == 0) {
                return None;
            }
            let old = before
                .iter()
                .position(|o| o.name == u.name)
                .and_then(|i| Some((&before[i], counts.get(i)?.as_deref()?)));
            let counts = u
                .backends
                .iter()
                .map(|b| {
                    old.and_then(|(o, counts)| {
                        let j = o.backends.iter().position(|ob| ob.addr == b.addr)?;
                        counts.counts.get(j).cloned()
                    })
                    .unwrap_or_default()
                })
                .collect();
            Some(Arc::new(InUse { counts }))
        })
        .collect()
}

/// Backends' active-health verdicts, written by the checker thread and
/// read by every shard (one relaxed load per backend per pick).
#[derive(Debug)]
pub struct HealthState {
    up: Box<[AtomicBool]>,
}

impl HealthState {
    /// `n` backends, all up until checks say otherwise.
    pub fn new(n: usize) -> HealthState {
        HealthState {
            up: (0..n).map(|_| AtomicBool::new(true)).collect(),
        }
    }

    /// Is backend `i` up?
    pub fn is_up(&self, i: usize) -> bool {
        self.up.get(i).is_some_and(|u| u.load(Ordering::Relaxed))
    }

    /// How many backends are down.
    pub fn down(&self) -> u64 {
        self.up
            .iter()
            .filter(|u| !u.load(Ordering::Relaxed))
            .count() as u64
    }

    /// Marks backend `i` up or down.
    pub fn set(&self, i: usize, up: bool) {
        if let Some(u) = self.up.get(i) {
            u.store(up, Ordering::Relaxed);
        }
    }
}

/// Holds one in-flight slot on a backend (least connections), and its
/// connection slot under `max_conns`; released on drop.
pub struct Lease<'a> {
    backend: Option<&'a Backend>,
    slot: Option<&'a AtomicU32>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.backend {
            b.active.set(b.active.get().saturating_sub(1));
        }
        if let Some(s) = self.slot {
            s.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Balancer {
    /// Round robin over equally weighted `backends`, nginx's passive-health
    /// defaults (for `tcp` routes).
    pub fn new(backends: Vec<SocketAddr>, start: usize) -> Balancer {
        let backends = backends
            .into_iter()
            .map(|addr| WeightedBackend {
                addr,
                weight: 1,
                max_conns: 0,
            })
            .collect();
        Balancer::with_policy(
            backends,
            start,
            Balance::RoundRobin,
            DEFAULT_MAX_FAILS,
            DEFAULT_FAIL_TIMEOUT,
            None,
            None,
        )
    }

    /// A balancer for an upstream group's settings, with the process'
    /// health verdicts and in-use counts for the group.
    pub fn for_upstream(
        u: &Upstream,
        start: usize,
        health: Option<Arc<HealthState>>,
        in_use: Option<Arc<InUse>>,
    ) -> Balancer {
        Balancer::with_policy(
            u.backends.clone(),
            start,
            u.balance.clone(),
            u.max_fails,
            u.fail_timeout,
            health,
            in_use,
        )
    }

    /// A balancer with explicit settings (`max_fails` 0 disables passive
    /// health).
    pub fn with_policy(
        backends: Vec<WeightedBackend>,
        start: usize,
        balance: Balance,
        max_fails: u32,
        fail_timeout: Duration,
        health: Option<Arc<HealthState>>,
        in_use: Option<Arc<InUse>>,
    ) -> Balancer {
        let start = if backends.is_empty() {
            0
        } else {
            start % backends.len()
        };
        let mut ring = Vec::new();
        if matches!(balance, Balance::Hash(_)) {
            for (i, points) in ring_points(&backends).into_iter().enumerate() {
                // Points depend only on the address and the weights, so
                // every shard and every host with the same list builds the
                // same ring.
                let name = backends[i].addr.to_string();
                for p in 0..points {
                    ring.push((hash(&[name.as_bytes(), &p.to_le_bytes()]), i));
                }
            }
            ring.sort_unstable();
        }
        Balancer {
            backends: backends
                .into_iter()
                .map(|b| Backend {
                    addr: b.addr,
                    weight: b.weight,
                    fails: Cell::new(0),
                    down_until: Cell::new(None),
                    active: Cell::new(0),
                    max_conns: b.max_conns,
                    current: Cell::new(0),
                })
                .collect(),
            balance,
            ring,
            next: Cell::new(start),
            max_fails,
            fail_timeout,
            health,
            in_use,
            full_log: crate::clock::LogEvery::default(),
            connect_log: crate::clock::LogEvery::default(),
            failure_log: crate::clock::LogEvery::default(),
        }
    }

    /// The group's policy.
    pub fn balance(&self) -> &Balance {
        &self.balance
    }

    fn usable(&self, i: usize, now: Instant) -> bool {
        let passive = self.backends[i].down_until.get().is_none_or(|t| now >= t);
        passive && self.health.as_ref().is_none_or(|h| h.is_up(i))
    }

    /// Indices in rotation order from the current start; advances it.
    fn rotation(&self) -> impl Iterator<Item = usize> {
        let n = self.backends.len();
        let first = self.next.get();
        if n > 0 {
            self.next.set((first + 1) % n);
        }
        (0..n).map(move |i| (first + i) % n)
    }

    /// The order to try backends for one request or connection, at time
    /// `now`: the policy's choice first, then the other usable backends,
    /// then those marked down. `key` is the hash key (`None`: no key, or
    /// not hashing).
    #[cfg(test)]
    pub fn plan_at(&self, now: Instant, key: Option<&[u8]>) -> Vec<SocketAddr> {
        self.order_at(now, key)
            .into_iter()
            .map(|i| self.backends[i].addr)
            .collect()
    }

    /// The plan as indexes into the backends: `acquire` reads the
    /// addresses one at a time, so no second list per request. Inline up
    /// to 8 backends: a `Vec` here was one of a keep-alive request's
    /// eleven allocations (tests/request_cost.rs).
    fn order_at(&self, now: Instant, key: Option<&[u8]>) -> Order {
        let n = self.backends.len();
        let order: Order = match (&self.balance, key) {
            (Balance::Hash(_), Some(key)) if !self.ring.is_empty() => {
                let h = hash(&[key]);
                let at = self.ring.partition_point(|&(p, _)| p < h);
                let mut seen: SmallVec<[bool; 8]> = smallvec::smallvec![false; n];
                let mut order = Order::with_capacity(n);
                for &(_, i) in self.ring[at..].iter().chain(&self.ring[..at]) {
                    if !seen[i] {
                        seen[i] = true;
                        order.push(i);
                        if order.len() == n {
                            break;
                        }
                    }
                }
                order
            }
            (Balance::LeastConn, _) => {
                let mut order: Order = self.rotation().collect();
                // Fewest in flight per unit of weight first (a/wa < b/wb
                // compared as a*wb < b*wa); the sort is stable, so ties
                // keep the rotation.
                order.sort_by(|&a, &b| {
                    let (a, b) = (&self.backends[a], &self.backends[b]);
                    (u64::from(a.active.get()) * u64::from(b.weight))
                        .cmp(&(u64::from(b.active.get()) * u64::from(a.weight)))
                });
                order
            }
            _ => {
                let mut rotation: Order = self.rotation().collect();
                if let Some(pick) = self.smooth_weighted_pick(&rotation, now) {
                    if let Some(at) = rotation.iter().position(|&i| i == pick) {
                        rotation[..=at].rotate_right(1);
                    }
                }
                rotation
            }
        };
        // Usable first; the sort is stable, so each part keeps its order.
        let mut order = order;
        order.sort_by_key(|&i| !self.usable(i, now));
        order
    }

    /// nginx's smooth weighted round robin over the usable backends: each
    /// pick adds every weight to its backend's current value and takes the
    /// largest, which then gives back the total. Weights 5,1,1 give
    /// a a b a c a a, not a a a a a b c.
    fn smooth_weighted_pick(&self, rotation: &[usize], now: Instant) -> Option<usize> {
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for &i in rotation {
            if !self.usable(i, now) {
                continue;
            }
            let b = &self.backends[i];
            b.current.set(b.current.get() + i64::from(b.weight));
            total += i64::from(b.weight);
            if best.is_none_or(|j| b.current.get() > self.backends[j].current.get()) {
                best = Some(i);
            }
        }
        let pick = best?;
        let b = &self.backends[pick];
        b.current.set(b.current.get() - total);
        Some(pick)
    }

    /// Counts a request (or connection) in flight on `addr` until the
    /// lease drops (least connections), beyond any `max_conns`.
    #[cfg(test)]
    pub fn lease(&self, addr: SocketAddr) -> Lease<'_> {
        let backend = self.backends.iter().find(|b| b.addr == addr);
        if let Some(b) = backend {
            b.active.set(b.active.get().saturating_add(1));
        }
        Lease {
            backend,
            slot: None,
        }
    }

    /// A lease on backend `i`, with a connection slot where it has
    /// `max_conns`; `None` when it has that many in use.
    fn lease_at(&self, i: usize) -> Option<Lease<'_>> {
        let b = &self.backends[i];
        let slot = match &self.in_use {
            Some(u) if b.max_conns > 0 => Some(u.take(i, b.max_conns)?),
            _ => None,
        };
        b.active.set(b.active.get().saturating_add(1));
        Some(Lease {
            backend: Some(b),
            slot,
        })
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
    /// The caller records the backend's success ([`Balancer::succeeded`])
    /// once what it connected for worked (a TLS handshake).
    pub async fn connect(
        &self,
        timeout: Duration,
    ) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        self.acquire_from(|_, _| None, None, timeout, Instant::now(), &[])
            .await
            .map(|(s, a, _, _)| (s, a))
    }

    /// A new connection in plan order for `key` (`balance = "hash"`), with
    /// its lease (held for the connection's life: `least_conn` counts it).
    /// For bytes passed through: the connect is all there is to judge the
    /// backend by, so it counts as its success.
    pub async fn connect_keyed(
        &self,
        key: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(TcpStream, SocketAddr, Lease<'_>), UpstreamError> {
        let (s, addr, _, lease) = self
            .acquire_from(|_, _| None, key, timeout, Instant::now(), &[])
            .await?;
        self.succeeded(addr);
        Ok((s, addr, lease))
    }

    /// A backend connection for one request: in plan order, an idle pooled
    /// connection to that backend if `pool` has one (`(group, pool)`),
    /// else a new connection. Returns the stream, the backend, whether it
    /// was pooled, and the in-flight lease on the backend (taken before
    /// any wait, so a burst planned at once does not all pick one backend
    /// under `least_conn`). `now` is the caller's clock reading for the
    /// request (one per request; re-read here only after a failed connect).
    /// `tried`: backends this request already failed on (their connection's
    /// set-up), skipped; if one of them is now marked down, the request
    /// had its probe of a down backend.
    pub async fn acquire(
        &self,
        pool: Option<(usize, &pool::Pool)>,
        key: Option<&[u8]>,
        timeout: Duration,
        pool_idle: Duration,
        now: Instant,
        tried: &[SocketAddr],
    ) -> Result<(conn::BackendConn, SocketAddr, bool, Lease<'_>), UpstreamError> {
        let take = |addr, now| pool.and_then(|(group, p)| p.take_for(group, addr, pool_idle, now));
        self.acquire_from(take, key, timeout, now, tried).await
    }

    /// [`Balancer::acquire`] with `take` for the pool lookup: `T` is what
    /// the caller's pool holds (nothing, for [`Balancer::connect`]).
    async fn acquire_from<T: From<TcpStream>>(
        &self,
        mut take: impl FnMut(SocketAddr, Instant) -> Option<T>,
        key: Option<&[u8]>,
        timeout: Duration,
        now: Instant,
        skip: &[SocketAddr],
    ) -> Result<(T, SocketAddr, bool, Lease<'_>), UpstreamError> {
        let mut last = None;
        let mut out_of_ports = None;
        let (mut tried, mut full) = (0, 0);
        let planned = now;
        // Whether a connect to a backend marked down was tried (in this
        // call, or on one of `skip`, now down).
        let mut probed = skip.iter().any(|a| {
            self.backends
                .iter()
                .position(|b| b.addr == *a)
                .is_some_and(|i| !self.usable(i, planned))
        });
        // Re-read after each failed connect, which may have waited up to
        // `timeout`: pooled connections are aged against the real time.
        let mut now = now;
        for i in self.order_at(now, key) {
            let addr = self.backends[i].addr;
            if skip.contains(&addr) {
                continue;
            }
            // Backends marked down come last and are tried when no other
            // is left; not when others are only full: that is load to
            // shed at once (503), not a connect to wait out.
            if full > 0 && !self.usable(i, now) {
                continue;
            }
            // And then one of them per request, in the policy's order, so
            // the next request probes the next: with every backend down
            // (an outage, a blackholed network), a request waits for one
            // connect, not for `connect_timeout` times the group's size,
            // and a recovering group is not met by a connect storm. nginx
            // answers 502 without trying any ("no live upstreams").
            let down = !self.usable(i, planned);
            // A backend at its max_conns is skipped, as nginx does; the
            // plan's next one takes the request.
            let Some(lease) = self.lease_at(i) else {
                full += 1;
                continue;
            };
            if let Some(s) = take(addr, now) {
                return Ok((s, addr, true, lease));
            }
            // Only the connect is skipped: an idle pooled connection to
            // a backend marked down is still taken above.
            if down && probed {
                continue;
            }
            tried += 1;
            probed |= down;
            // Boxed: the timer is over-aligned, and inline it would make
            // the futures `acquire` sits in over-aligned too: HTTP/1.1's
            // request state (which `forward::boxed` refuses at compile
            // time) and HTTP/2's boxed `begin_attempt`, pool hits included.
            let connect = monoio::time::timeout(timeout, TcpStream::connect_addr(addr));
            let res = match Box::pin(connect).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
            };
            match res {
                Ok(s) => {
                    // Proxied bytes are already batched by the client; no
                    // Nagle delay on top (nginx sets TCP_NODELAY likewise).
                    let _ = s.set_nodelay(true);
                    // Not yet a success: a backend that accepts and then
                    // fails every request (or TLS handshake) must reach
                    // `max_fails`. The caller says when it worked.
                    return Ok((s.into(), addr, false, lease));
                }
                Err(e) if is_local_exhaustion(&e) => {
                    // Another backend would fail the same way: stop here,
                    // and do not blame this one.
                    return Err(UpstreamError::Local { addr, source: e });
                }
                Err(e) if is_out_of_ports(&e) => {
                    // Not this backend's failure: the next one is tried,
                    // and this one stays in the rotation.
                    tracing::debug!(backend = %addr, error = %e, "no local port left towards the backend");
                    out_of_ports = Some((addr, e));
                }
                Err(e) => {
                    tracing::debug!(backend = %addr, error = %e, "backend connect failed");
                    now = Instant::now();
                    self.failed(addr, now);
                    last = Some((addr, e));
                }
            }
        }
        if tried == 0 && full > 0 {
            return Err(UpstreamError::Full { backends: full });
        }
        if let (None, Some((addr, source))) = (&last, out_of_ports) {
            return Err(UpstreamError::Local { addr, source });
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

/// Ring points per backend: [`RING_POINTS`] per unit of weight, weights
/// first divided by their common divisor, and the whole ring capped at
/// 4 × [`RING_POINTS`] per backend on average (a per-shard table of at most
/// ~10 KiB per backend however large the configured weights).
fn ring_points(backends: &[WeightedBackend]) -> Vec<u32> {
    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let g = backends.iter().fold(0, |g, b| gcd(g, b.weight)).max(1);
    let units: Vec<u64> = backends.iter().map(|b| u64::from(b.weight / g)).collect();
    let total: u64 = units.iter().sum::<u64>() * u64::from(RING_POINTS);
    let cap = 4 * u64::from(RING_POINTS) * backends.len() as u64;
    units
        .iter()
        .map(|&u| {
            let p = u * u64::from(RING_POINTS);
            let p = if total > cap { p * cap / total } else { p };
            p.max(1) as u32
        })
        .collect()
}

/// 64-bit FNV-1a over `parts`, then splitmix64's finalizer (FNV alone
/// clusters short, similar keys on the ring). Stable across processes and
/// hosts, unlike std's randomly seeded hasher: a fleet must agree.
fn hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HashKey;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (1..=n)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect()
    }

    fn weighted(a: &[SocketAddr], w: &[u32]) -> Vec<WeightedBackend> {
        a.iter()
            .zip(w)
            .map(|(&addr, &weight)| WeightedBackend {
                addr,
                weight,
                max_conns: 0,
            })
            .collect()
    }

    fn balancer(a: &[SocketAddr], w: &[u32], balance: Balance) -> Balancer {
        Balancer::with_policy(
            weighted(a, w),
            0,
            balance,
            1,
            Duration::from_secs(10),
            None,
            None,
        )
    }

    #[test]
    fn smooth_weighted_round_robin_interleaves_by_weight() {
        let a = addrs(3);
        let b = balancer(&a, &[5, 1, 1], Balance::RoundRobin);
        let now = Instant::now();
        let picks: Vec<SocketAddr> = (0..14).map(|_| b.plan_at(now, None)[0]).collect();
        let count = |x| picks.iter().filter(|p| **p == x).count();
        assert_eq!((count(a[0]), count(a[1]), count(a[2])), (10, 2, 2));
        // Smooth: the light backends are spread through each cycle of 7,
        // never a run of five heavy picks.
        assert!(
            picks.windows(5).all(|w| w.iter().any(|p| *p != a[0])),
            "{picks:?}"
        );
        // Every plan still lists every backend once (for connect retries).
        let mut plan = b.plan_at(now, None);
        plan.sort();
        assert_eq!(plan, a);
    }

    #[test]
    fn least_conn_prefers_fewest_in_flight_per_weight() {
        let a = addrs(3);
        let b = balancer(&a, &[1, 1, 2], Balance::LeastConn);
        let now = Instant::now();
        let l0 = b.lease(a[0]);
        let _l2 = b.lease(a[2]);
        // a1 has 0 in flight: first. a2 has 1 per weight 2 (0.5) before a0 (1).
        assert_eq!(b.plan_at(now, None), vec![a[1], a[2], a[0]]);
        let _l1 = b.lease(a[1]);
        let _l1b = b.lease(a[1]);
        assert_eq!(b.plan_at(now, None)[0], a[2]);
        drop(l0);
        assert_eq!(
            b.plan_at(now, None)[0],
            a[0],
            "a released lease counts again"
        );
    }

    #[test]
    fn consistent_hash_is_stable_and_moves_only_a_removed_backends_keys() {
        let a = addrs(4);
        let all = balancer(&a, &[1, 1, 1, 1], Balance::Hash(HashKey::ClientIp));
        let three = balancer(&a[..3], &[1, 1, 1], Balance::Hash(HashKey::ClientIp));
        let again = balancer(&a, &[1, 1, 1, 1], Balance::Hash(HashKey::ClientIp));
        let now = Instant::now();
        let mut per_backend = [0usize; 4];
        let mut moved = 0;
        for k in 0..4000u32 {
            let key = k.to_be_bytes();
            let first = all.plan_at(now, Some(&key))[0];
            // Same list, another balancer (another shard or host): same pick.
            assert_eq!(again.plan_at(now, Some(&key))[0], first);
            per_backend[a.iter().position(|x| *x == first).unwrap()] += 1;
            let without = three.plan_at(now, Some(&key))[0];
            if first != a[3] {
                assert_eq!(without, first, "key {k} moved although its backend stayed");
            } else {
                moved += 1;
            }
        }
        assert_eq!(moved, per_backend[3]);
        for n in per_backend {
            assert!((700..1300).contains(&n), "uneven ring: {per_backend:?}");
        }
        // A down backend's keys go to the next backend on the ring, and
        // only while it is down.
        let key = 7u32.to_be_bytes();
        let plan = all.plan_at(now, Some(&key));
        all.failed(plan[0], now);
        let later = all.plan_at(now, Some(&key));
        assert_eq!((later[0], later[3]), (plan[1], plan[0]));
        all.succeeded(plan[0]);
        assert_eq!(all.plan_at(now, Some(&key))[0], plan[0]);
    }

    #[test]
    fn ring_size_is_bounded_and_keeps_weight_ratios() {
        let a = addrs(3);
        assert_eq!(ring_points(&weighted(&a, &[1, 1, 1])), vec![160, 160, 160]);
        // Common divisors do not inflate the ring.
        assert_eq!(
            ring_points(&weighted(&a, &[10, 10, 20])),
            vec![160, 160, 320]
        );
        // Huge weights are scaled down to the cap, ratios kept.
        let p = ring_points(&weighted(&a, &[1000, 999, 1]));
        assert!(
            p.iter().map(|&x| u64::from(x)).sum::<u64>() <= 4 * 160 * 3,
            "{p:?}"
        );
        assert!(p[0] >= p[1] && p[1] > 100 * p[2] / 2 && p[2] >= 1, "{p:?}");
    }

    #[test]
    fn active_health_verdicts_put_backends_last() {
        let a = addrs(2);
        let h = Arc::new(HealthState::new(2));
        let b = Balancer::with_policy(
            weighted(&a, &[1, 1]),
            0,
            Balance::RoundRobin,
            0,
            Duration::ZERO,
            Some(h.clone()),
            None,
        );
        let now = Instant::now();
        h.set(0, false);
        for _ in 0..4 {
            assert_eq!(b.plan_at(now, None), vec![a[1], a[0]]);
        }
        h.set(0, true);
        assert!((0..4).any(|_| b.plan_at(now, None)[0] == a[0]));
    }

    /// A pooled connection, for `acquire_from` without a network.
    struct Pooled;

    type Acquired<'b> = Result<(Pooled, SocketAddr, bool, Lease<'b>), UpstreamError>;

    impl From<TcpStream> for Pooled {
        fn from(_: TcpStream) -> Pooled {
            Pooled
        }
    }

    /// A request whose connection's set-up failed on some backends skips
    /// them on its next try, whatever the policy's order (a hash puts the
    /// same backend first each time); and when one of them is now marked
    /// down, the request had its one probe of a down backend: no other is
    /// connected to (an outage costs a request one try).
    #[test]
    fn a_request_skips_backends_it_failed_on_and_probes_one_down_backend() {
        let a = addrs(3);
        let b = Balancer::with_policy(
            weighted(&a, &[1, 1, 1]),
            0,
            Balance::Hash(crate::config::HashKey::ClientIp),
            1,
            Duration::from_secs(10),
            None,
            None,
        );
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        let key: &[u8] = b"client";
        let mut pick = |skip: &[SocketAddr]| {
            rt.block_on(Balancer::acquire_from(
                &b,
                |_, _| Some(Pooled),
                Some(key),
                Duration::from_secs(1),
                Instant::now(),
                skip,
            ))
            .ok()
            .map(|(_, addr, _, _)| addr)
        };
        let first = pick(&[]).unwrap();
        assert_eq!(
            pick(&[]),
            Some(first),
            "a hash's first is the same each time"
        );
        let second = pick(&[first]).unwrap();
        assert_ne!(second, first);
        let third = pick(&[first, second]).unwrap();
        assert!(third != first && third != second);
        assert_eq!(pick(&a), None, "every one skipped");
        // Every backend down, one of them already tried by this request:
        // nothing is connected to (the pool's take is not asked either:
        // a connect would be next).
        let now = Instant::now();
        for &x in &a {
            b.failed(x, now);
        }
        let got = rt.block_on(Balancer::acquire_from(
            &b,
            |_, _| None::<Pooled>,
            Some(key),
            Duration::from_secs(1),
            Instant::now(),
            &[first],
        ));
        assert!(
            matches!(got, Err(UpstreamError::Connect { tried: 0, .. })),
            "{:?}",
            got.map(|(_, addr, _, _)| addr)
        );
    }

    /// `max_conns`: a backend with that many leases held is skipped (the
    /// plan's next one is used), on every shard's balancer alike (one
    /// process-wide count); a dropped lease frees its slot; with every
    /// usable backend full, `Full`, and nothing was tried: not the backend
    /// marked down, which would take the overflow otherwise.
    #[test]
    fn backends_at_max_conns_are_skipped_on_every_shard() {
        let a = addrs(3);
        let mut backends = weighted(&a, &[1, 1, 1]);
        backends[0].max_conns = 2;
        backends[1].max_conns = 1;
        let counts = Arc::new(InUse::new(3));
        let shard = |start| {
            let b = Balancer::with_policy(
                backends.clone(),
                start,
                Balance::RoundRobin,
                1,
                Duration::from_secs(10),
                None,
                Some(counts.clone()),
            );
            // a[2]: no cap, but down (one failure, max_fails 1).
            b.failed(a[2], Instant::now());
            b
        };
        let (one, two) = (shard(0), shard(1));
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        let mut take = |b| {
            rt.block_on(Balancer::acquire_from(
                b,
                |_, _| Some(Pooled),
                None,
                Duration::from_secs(1),
                Instant::now(),
                &[],
            ))
        };
        let got = |r: &Acquired<'_>| r.as_ref().ok().map(|(_, addr, _, _)| *addr);
        let l1 = take(&one);
        let l2 = take(&two);
        let l3 = take(&one);
        let mut held: Vec<_> = [&l1, &l2, &l3].iter().map(|r| got(r).unwrap()).collect();
        held.sort();
        assert_eq!(held, [a[0], a[0], a[1]], "each backend up to its cap");
        assert_eq!((counts.get(0), counts.get(1)), (2, 1));
        let full = take(&two);
        assert!(
            matches!(full, Err(UpstreamError::Full { backends: 2 })),
            "not Full: {:?}",
            full.as_ref().map(|r| r.1)
        );
        // A freed slot is taken again, from the other shard too.
        let freed = got(&l2).unwrap();
        drop(l2);
        assert_eq!(got(&take(&one)), Some(freed));
        drop((l1, l3));
        assert_eq!((counts.get(0), counts.get(1)), (0, 0));
    }

    /// Ports on 127.0.0.1 that refuse connections (bound, then closed).
    fn refusing(n: usize) -> Vec<SocketAddr> {
        let held: Vec<_> = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        held.iter().map(|l| l.local_addr().unwrap()).collect()
    }

    #[test]
    fn one_backend_marked_down_is_tried_per_request() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let a = refusing(3);
        let b = Balancer::with_policy(
            weighted(&a, &[1, 1, 1]),
            0,
            Balance::RoundRobin,
            1,
            Duration::from_secs(60),
            None,
            None,
        );
        let connect =
            |rt: &mut monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>>| match rt
                .block_on(b.connect(Duration::from_secs(5)))
            {
                Err(UpstreamError::Connect { tried, addr, .. }) => (tried, addr),
                other => panic!("{:?}", other.map(|(_, addr)| addr)),
            };
        // Healthy at first: every backend is tried (and each now down).
        assert_eq!(connect(&mut rt).0, 3);
        // All down: one per request, each request the next in rotation.
        let probes: Vec<_> = (0..3).map(|_| connect(&mut rt)).collect();
        assert!(probes.iter().all(|&(tried, _)| tried == 1), "{probes:?}");
        let mut seen: Vec<_> = probes.iter().map(|&(_, addr)| addr).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 3, "{probes:?}");
        // An idle pooled connection to a down backend is still taken after
        // the one probe: only connects are limited. (Whichever backend
        // the rotation starts at, the probe fails first or the pool hits.)
        for pooled in &a {
            let got = rt.block_on(Balancer::acquire_from(
                &b,
                |addr, _| (addr == *pooled).then_some(Pooled),
                None,
                Duration::from_secs(5),
                Instant::now(),
                &[],
            ));
            assert_eq!(
                got.map(|(_, addr, hit, _)| (addr, hit)).ok(),
                Some((*pooled, true))
            );
        }
        // A usable backend that fails is tried before the one probe.
        b.succeeded(a[1]);
        assert_eq!(connect(&mut rt).0, 2);
        // A backend that came back is found by the probes in turn.
        let back = std::net::TcpListener::bind(a[2]).unwrap();
        let found = (0..3).find_map(|_| rt.block_on(b.connect(Duration::from_secs(5))).ok());
        assert_eq!(
            found.map(|(_, addr)| addr),
            Some(back.local_addr().unwrap())
        );
    }

    fn group(name: &str, backends: &[(u16, u32)]) -> Upstream {
        Upstream {
            name: name.into(),
            backends: backends
                .iter()
                .map(|&(port, max_conns)| WeightedBackend {
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    weight: 1,
                    max_conns,
                })
                .collect(),
            balance: Balance::RoundRobin,
            health: None,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            pool_size: 1,
            pool_idle_timeout: Duration::from_secs(1),
            max_fails: 1,
            fail_timeout: Duration::from_secs(1),
            send_proxy: None,
            tls: None,
        }
    }

    /// A reload keeps each backend's count while it stays (by address) in
    /// a group of the same name, whatever else changed: the connections in
    /// use under the old configuration still count against the new cap.
    #[test]
    fn in_use_counts_follow_backends_across_a_reload() {
        let before = [group("a", &[(1, 2), (2, 2)]), group("free", &[(9, 0)])];
        let counts = in_use_counts(&before, &[], &[]);
        assert!(counts[1].is_none(), "no cap, no count");
        let old = counts[0].clone().unwrap();
        let held = [old.take(0, 2).unwrap(), old.take(1, 2).unwrap()];
        // Port 1's cap lowered to 1, port 2 gone, port 3 new, the other
        // group capped now.
        let after = [group("free", &[(9, 5)]), group("a", &[(3, 1), (1, 1)])];
        let new = in_use_counts(&after, &before, &counts);
        let a = new[1].clone().unwrap();
        assert_eq!((a.get(0), a.get(1)), (0, 1), "port 3 new, port 1 kept");
        assert!(
            a.take(1, 1).is_none(),
            "the old connection fills the new cap"
        );
        assert_eq!(new[0].as_ref().unwrap().get(0), 0);
        // The old generation's lease ends: the slot is free in the new one.
        held[0].fetch_sub(1, Ordering::AcqRel);
        assert!(a.take(1, 1).is_some());
        assert_eq!(held[1].load(Ordering::Relaxed), 1, "port 2's own count");
    }

    #[test]
    fn plan_rotates_and_covers_every_backend() {
        let a = addrs(3);
        let b = Balancer::new(a.clone(), 0);
        let now = Instant::now();
        assert_eq!(b.plan_at(now, None), a);
        assert_eq!(b.plan_at(now, None), vec![a[1], a[2], a[0]]);
        let empty = Balancer::new(Vec::new(), 5);
        assert!(empty.plan_at(now, None).is_empty());
    }

    #[test]
    fn failed_backends_go_last_until_their_timeout_then_return() {
        let a = addrs(3);
        let b = Balancer::with_policy(
            weighted(&a, &[1, 1, 1]),
            0,
            Balance::RoundRobin,
            2,
            Duration::from_secs(10),
            None,
            None,
        );
        let t0 = Instant::now();
        b.failed(a[0], t0);
        assert_eq!(
            b.plan_at(t0, None)[0],
            a[0],
            "one failure is under max_fails = 2"
        );
        b.failed(a[0], t0);
        for _ in 0..3 {
            let plan = b.plan_at(t0 + Duration::from_secs(1), None);
            assert_eq!(plan.len(), 3, "down backends are still tried, last");
            assert_eq!(plan[2], a[0]);
        }
        assert!(b
            .plan_at(t0 + Duration::from_secs(11), None)
            .contains(&a[0]));
        let plan: Vec<_> = (0..3)
            .map(|_| b.plan_at(t0 + Duration::from_secs(11), None)[0])
            .collect();
        assert!(
            plan.contains(&a[0]),
            "back in rotation after fail_timeout: {plan:?}"
        );
        b.failed(a[1], t0);
        b.failed(a[1], t0);
        b.succeeded(a[1]);
        assert!(
            (0..3).any(|_| b.plan_at(t0, None)[0] == a[1]),
            "a success clears the mark"
        );
    }
}
