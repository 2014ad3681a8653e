//! Per-core shards: one thread per CPU, pinned with `core_affinity`, each
//! with its own monoio runtime (io_uring, or the legacy epoll driver) and its
//! own `SO_REUSEPORT` socket per listener, so the kernel spreads connections
//! over shards and nothing on the connection path is shared between threads.
//!
//! A shard serves config *generations*. The control thread (`control`)
//! parses the config, loads keys, builds the rustls configs and binds the
//! sockets, then sends the shard a [`Command::Update`]. The shard only swaps
//! a pointer: new connections get the new generation, open ones keep the
//! one they started with (each holds an `Rc<ShardGen>`), and an old
//! generation is freed when its last connection ends.

use std::cell::RefCell;
use std::io;
use std::io::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{Config, Route};
use crate::metrics::family::{self, ClassCounters};
use crate::metrics::ShardMetrics;
use crate::proxy::drain::DrainSignal;
use crate::proxy::idle::{self, IdleSweeper};
use crate::proxy::tcp::PipePool;
use crate::upstream::pool::Pool;
use crate::upstream::{Balancer, HealthState, InUse};

pub mod clients;
pub mod driver;
pub mod proxy_header;

/// One config generation, built off the shards and shared by all of them.
#[derive(Debug)]
pub struct Generation {
    /// Counts up from 1 at start; in logs, `/metrics` and `ktern reload`.
    pub number: u64,
    /// The validated config.
    pub config: Arc<Config>,
    /// rustls server configs, `[shard][listener]` (one per shard; a
    /// listener's certificate store, ticket keys and TLS 1.2 session-id
    /// cache are shared by its shards' configs).
    pub tls: Vec<Vec<crate::handshake::ServerTls>>,
    /// Active-health verdicts per upstream group (`None`: no checks).
    pub health: Vec<Option<Arc<HealthState>>>,
    /// Connections in use per backend of each upstream group with a
    /// `max_conns` (`None`: no cap), shared by every shard.
    pub in_use: Vec<Option<Arc<InUse>>>,
    /// Connections open per client (`max_conns_per_client`): one table
    /// for the process, handed from generation to generation.
    pub clients: Arc<clients::ClientTable>,
    /// Which listening socket (by key) serves which listener.
    pub slots: Vec<(u64, Slot)>,
    /// The access log, opened for this generation (a reload reopens it,
    /// so a rotated file is followed).
    pub access: Option<crate::metrics::access::Sink>,
    /// ACME challenge answers (HTTP-01 here; TLS-ALPN-01 through each
    /// listener's validation config). One table for the process, in every
    /// generation.
    pub challenges: Arc<crate::challenges::Challenges>,
}

impl Generation {
    /// What the socket `key` serves in this generation.
    pub fn slot(&self, key: u64) -> Option<Slot> {
        self.slots.iter().find(|(k, _)| *k == key).map(|(_, s)| *s)
    }
}

/// What a listening socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// TLS listener `i` of the config.
    Tls(usize),
    /// Plain-HTTP redirect listener `i`.
    Redirect(usize),
}

/// A shard's view of one generation: the shared part, plus the per-shard
/// state built from it (balancers, backend pool).
pub struct ShardGen {
    /// The shared generation.
    pub gen: Arc<Generation>,
    /// This shard's rustls config per listener.
    pub tls: Vec<crate::handshake::ServerTls>,
    /// Backend choice per listener (`tcp` routes; empty for `http`).
    pub balancers: Vec<Balancer>,
    /// rustls client configs per listener, per backend in the route's
    /// order (`tcp` routes with `tls`; empty otherwise), per protocol the
    /// client may have chosen (`client_configs_by_alpn`): each backend's
    /// share one session store, so tickets stay per shard and per backend.
    pub upstream_tls: Vec<Vec<Vec<Arc<rustls::ClientConfig>>>>,
    /// The same per upstream group with `tls` (`http` routes), one per
    /// backend in the group's order.
    pub group_tls: Vec<Vec<Arc<rustls::ClientConfig>>>,
    /// Backend choice per upstream group (`http` routes).
    pub upstream_balancers: Vec<Rc<Balancer>>,
    /// Idle keep-alive connections per upstream group (each pool holds one
    /// group, index 0).
    pub pools: Vec<Rc<Pool>>,
    /// Open connections per listener (gauge).
    pub active: Vec<Arc<std::sync::atomic::AtomicU64>>,
    /// HTTP responses per listener: one counter set per upstream group,
    /// then static files, then ktern's own answers (last).
    pub responses: Vec<Vec<Arc<ClassCounters>>>,
    /// When a newer generation replaced this one. Its HTTP connections
    /// run on (they finish on the config they started with), but once it
    /// has been retired for longer than the route's keep-alive timeout
    /// they answer their next request with `Connection: close`, so none
    /// keeps an outdated route for long. Not at once: under frequent
    /// reloads every keep-alive client would reconnect each time (measured
    /// in bench/reload.sh: p99 2.5x), and an idle one is not closed under a
    /// request that may be on its way. Tunnels run on.
    pub retired: std::cell::Cell<Option<std::time::Instant>>,
}

impl ShardGen {
    /// The per-shard state of `gen`. An upstream group that is unchanged
    /// from `previous` keeps its balancer (passive health, rotation) and
    /// its pool of idle backend connections: a reload does not make every
    /// request reconnect to the backends.
    fn new(
        id: usize,
        gen: Arc<Generation>,
        metrics: &ShardMetrics,
        previous: Option<&ShardGen>,
    ) -> ShardGen {
        let config = &gen.config;
        let families = &metrics.families;
        let active = config
            .listeners
            .iter()
            .map(|l| families.active_for(&l.name))
            .collect();
        let responses = config
            .listeners
            .iter()
            .map(|l| {
                config
                    .upstreams
                    .iter()
                    .map(|u| u.name.as_str())
                    .chain([family::STATIC, family::NONE])
                    .map(|u| families.responses_for(&l.name, u))
                    .collect()
            })
            .collect();
        let balancers = config
            .listeners
            .iter()
            .map(|l| match &l.route {
                Route::Tcp(t) => Balancer::new(t.backends.clone(), id),
                Route::Http(_) | Route::Passthrough(_) => Balancer::new(Vec::new(), id),
            })
            .collect();
        // One client config per backend, each with its own session store.
        let configs = |tls: Option<&crate::config::UpstreamTls>,
                       n: usize,
                       whose: &str,
                       alpn: &[&[u8]]| {
            let Some(tls) = tls else {
                return Vec::new();
            };
            match (0..n)
                .map(|_| crate::handshake::client::client_config(tls, alpn))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(configs) => configs,
                Err(e) => {
                    // Both providers do TLS 1.2 and 1.3: not expected.
                    // The route or group then has no configs and fails
                    // each connection (logged each time).
                    tracing::error!(whose, error = %e, "internal: cannot build the backend TLS config");
                    Vec::new()
                }
            }
        };
        let upstream_tls = config
            .listeners
            .iter()
            .map(|l| match &l.route {
                Route::Tcp(t) => {
                    let Some(tls) = t.tls.as_ref() else {
                        return Vec::new();
                    };
                    (0..t.backends.len())
                        .map(|_| crate::handshake::client::client_configs_by_alpn(tls, &l.alpn))
                        .collect::<Result<Vec<_>, _>>()
                        .unwrap_or_else(|e| {
                            // As `configs`: not expected.
                            tracing::error!(listener = %l.name, error = %e, "internal: cannot build the backend TLS config");
                            Vec::new()
                        })
                }
                _ => Vec::new(),
            })
            .collect();
        let group_tls = config
            .upstreams
            .iter()
            .map(|u| configs(u.tls.as_ref(), u.backends.len(), &u.name, &[b"http/1.1"]))
            .collect();
        let (upstream_balancers, pools) = config
            .upstreams
            .iter()
            .zip(gen.health.iter().zip(&gen.in_use))
            .map(|(u, (h, in_use))| {
                let same = previous.and_then(|p| {
                    let i = p.config().upstreams.iter().position(|o| o == u)?;
                    Some((p.upstream_balancers[i].clone(), p.pools[i].clone()))
                });
                same.unwrap_or_else(|| {
                    (
                        Rc::new(Balancer::for_upstream(u, id, h.clone(), in_use.clone())),
                        Rc::new(Pool::new(1)),
                    )
                })
            })
            .unzip();
        ShardGen {
            tls: gen.tls.get(id).cloned().unwrap_or_default(),
            balancers,
            upstream_tls,
            group_tls,
            upstream_balancers,
            pools,
            active,
            responses,
            retired: std::cell::Cell::new(None),
            gen,
        }
    }

    /// The generation's config.
    pub fn config(&self) -> &Config {
        &self.gen.config
    }
}

/// Everything one shard's connections share across generations. Lives on
/// the shard's thread.
pub struct Shard {
    /// Shard index (0-based).
    pub id: usize,
    /// kTLS capabilities probed at start.
    pub ktls: Arc<crate::ktls::Support>,
    /// This shard's counters.
    pub metrics: Arc<ShardMetrics>,
    /// Pipes for splice, reused across connections.
    pub pipes: PipePool,
    /// Idle-timeout entries, swept by one task per shard.
    pub idle: Rc<IdleSweeper>,
    /// Set when the process drains.
    pub drain: DrainSignal,
    current: RefCell<Rc<ShardGen>>,
    accepting: RefCell<Vec<(u64, Rc<AcceptStop>)>>,
    accept_log: crate::clock::LogEvery,
    /// Connections refused at `max_conns_per_client`.
    pub client_log: crate::clock::LogEvery,
    /// Failed client handshakes.
    pub handshake_log: crate::clock::LogEvery,
    /// Connections closed before TLS for what any peer can cause.
    pub peer_log: crate::clock::LogEvery,
    /// HTTP requests refused before their exchange (a bad head; a
    /// malformed HTTP/2 request): any client can send one per connection,
    /// or per stream.
    pub refused_log: crate::clock::LogEvery,
    /// Connections that ended with the client's error, or idle: any client
    /// can end each of its connections so.
    pub ended_log: crate::clock::LogEvery,
    /// Connections that ended with a backend's error.
    pub upstream_ended_log: crate::clock::LogEvery,
    /// A trusted load balancer's bad or slow PROXY headers.
    pub proxy_header_log: crate::clock::LogEvery,
}

impl Shard {
    /// The generation new connections get.
    pub fn current(&self) -> Rc<ShardGen> {
        self.current.borrow().clone()
    }
}

/// What the control thread asks of a shard.
pub enum Command {
    /// Serve generation `gen` from now on: start accepting on `sockets`
    /// (newly bound), stop accepting on sockets `gen` no longer has (after
    /// taking what their queues hold). Answers with the generation number.
    Update {
        /// The new generation.
        gen: Arc<Generation>,
        /// New listening sockets for this shard, by key.
        sockets: Vec<(u64, std::net::TcpListener)>,
        /// Acknowledgement.
        done: mpsc::SyncSender<u64>,
    },
    /// Drain, first step (at SIGTERM): close idle keep-alive connections
    /// and send `Connection: close` on the next response of busy ones, so
    /// that clients move their connections while the listeners still
    /// accept (behind a stateless ECMP router a connection still open when
    /// the route is withdrawn is reset).
    Close {
        /// Acknowledgement.
        done: mpsc::SyncSender<u64>,
    },
    /// Drain, second step (after the drain delay), or a binary upgrade:
    /// stop accepting, taking what the queues hold.
    StopAccepting {
        /// Acknowledgement, once every listener is closed.
        done: mpsc::SyncSender<u64>,
    },
    /// Drain, last step (`runtime.drain_timeout` has passed, or a second
    /// stop signal): every connection still open is dropped, writing the
    /// access lines of its requests in flight.
    Cut {
        /// Acknowledgement, once the connections are told (they drop as
        /// the shard runs them next).
        done: mpsc::SyncSender<u64>,
    },
}

/// The control thread's end of a running shard.
pub struct ShardLink {
    /// The shard's thread.
    pub thread: JoinHandle<()>,
    /// Its counters.
    pub metrics: Arc<ShardMetrics>,
    tx: mpsc::Sender<Command>,
    wake: std::os::unix::net::UnixStream,
}

impl ShardLink {
    /// Queues a command and wakes the shard's control task.
    pub fn send(&self, cmd: Command) -> io::Result<()> {
        self.tx
            .send(cmd)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "shard has stopped"))?;
        match (&self.wake).write(&[1]) {
            // A full socket buffer means a wake-up is already pending.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            r => r.map(drop),
        }
    }
}

/// Creates one listening socket: `SO_REUSEADDR` (restart while old
/// connections sit in TIME_WAIT), `SO_REUSEPORT` (one socket per shard on the
/// same address; the kernel hashes each new connection to one of them).
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    no_nagle(&socket)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// `TCP_NODELAY` on a listening socket: Linux copies the listener's
/// socket into each connection it accepts (`sk_clone_lock`), Nagle's flag
/// with it, so no accepted connection needs a `setsockopt` of its own (one
/// syscall fewer per connection). Also applied to the listeners a binary
/// upgrade hands over, which an older ktern bound without it.
pub fn no_nagle(listener: impl std::os::fd::AsFd) -> io::Result<()> {
    socket2::SockRef::from(&listener).set_tcp_nodelay(true)
}

/// Fails with `AddrInUse` when any other socket (another program, or
/// another ktern) listens on `addr`. Binding with `SO_REUSEPORT` alone
/// would silently join that socket's group and split its connections; a
/// probe bound without `SO_REUSEPORT` cannot share a listening port.
pub fn probe_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())
}

/// The CPUs to run shards on.
pub fn shard_cpus(config: &Config) -> Vec<usize> {
    if !config.runtime.cpus.is_empty() {
        return config.runtime.cpus.clone();
    }
    match core_affinity::get_core_ids() {
        Some(ids) if !ids.is_empty() => ids.into_iter().map(|c| c.id).collect(),
        _ => vec![0],
    }
}

/// How a shard's runtime is built.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeKind {
    /// io_uring (else monoio's legacy epoll driver).
    pub uring: bool,
    /// io_uring submission queue entries.
    pub entries: u32,
    /// io_uring setup flags for completion work.
    pub taskrun: crate::config::TaskRun,
}

/// Builds a shard's io_uring runtime with the wanted setup flags, falling
/// back flag by flag on kernels that refuse them (EINVAL before 6.0/6.1).
/// The ring is created on the shard's own thread, which alone submits to it
/// (what `SINGLE_ISSUER` promises the kernel).
fn uring_runtime(
    kind: RuntimeKind,
    shard: usize,
) -> io::Result<monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>> {
    use crate::config::TaskRun;
    let wanted = match kind.taskrun {
        TaskRun::Defer => vec![TaskRun::Defer, TaskRun::Coop, TaskRun::Off],
        TaskRun::Coop => vec![TaskRun::Coop, TaskRun::Off],
        TaskRun::Off => vec![TaskRun::Off],
    };
    let mut last = None;
    for taskrun in wanted {
        let mut urb = io_uring::IoUring::builder();
        match taskrun {
            TaskRun::Defer => {
                urb.setup_single_issuer().setup_defer_taskrun();
            }
            TaskRun::Coop => {
                urb.setup_single_issuer().setup_coop_taskrun();
            }
            TaskRun::Off => {}
        }
        match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(kind.entries)
            .uring_builder(urb)
            .enable_timer()
            .build()
        {
            Ok(rt) => {
                if taskrun != kind.taskrun {
                    tracing::warn!(shard, wanted = ?kind.taskrun, using = ?taskrun, "io_uring setup flags refused by the kernel: fell back");
                }
                return Ok(rt);
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::Unsupported)))
}

/// Starts shard `id` pinned to `cpu`, serving `first` (an
/// [`Command::Update`]) as soon as its runtime runs.
pub fn spawn(
    id: usize,
    cpu: usize,
    kind: RuntimeKind,
    support: Arc<crate::ktls::Support>,
    first: Command,
) -> io::Result<ShardLink> {
    let metrics = Arc::new(ShardMetrics::default());
    let (tx, rx) = mpsc::channel();
    let (wake, wake_rx) = std::os::unix::net::UnixStream::pair()?;
    wake.set_nonblocking(true)?;
    wake_rx.set_nonblocking(true)?;
    let shard_metrics = metrics.clone();
    let thread = std::thread::Builder::new()
        .name(format!("ktern-shard-{id}"))
        .spawn(move || {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                tracing::warn!(shard = id, cpu, "could not pin shard thread to its CPU");
            }
            let run = shard_main(id, support, shard_metrics, first, rx, wake_rx);
            let res = if kind.uring {
                uring_runtime(kind, id).map(|mut rt| rt.block_on(run))
            } else {
                monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                    .enable_timer()
                    .build()
                    .map(|mut rt| rt.block_on(run))
            };
            if let Err(e) = res {
                tracing::error!(shard = id, error = %e, "shard runtime failed to start");
            }
        })?;
    Ok(ShardLink {
        thread,
        metrics,
        tx,
        wake,
    })
}

thread_local! {
    /// The shard this thread runs, for what has none at hand: a connection
    /// task's caught panic ([`driver::contained`], whose wrapper stores
    /// nothing so that an idle connection's task does not grow).
    static THREAD_SHARD: RefCell<Option<(usize, Arc<ShardMetrics>)>> = const { RefCell::new(None) };
}

fn set_thread_shard(id: usize, metrics: Arc<ShardMetrics>) {
    THREAD_SHARD.with(|s| *s.borrow_mut() = Some((id, metrics)));
}

/// A connection task on this thread panicked and was caught: logged and
/// counted (`ktern_internal_errors_total`). The panic's message and place
/// are already on stderr (Rust's panic hook).
fn on_task_panic() {
    THREAD_SHARD.with(|s| match &*s.borrow() {
        Some((shard, m)) => {
            ShardMetrics::inc(&m.internal_errors);
            tracing::error!(
                shard,
                "internal: a connection's task panicked; that connection closed"
            );
        }
        None => tracing::error!("internal: a connection's task panicked; that connection closed"),
    });
}

async fn shard_main(
    id: usize,
    support: Arc<crate::ktls::Support>,
    metrics: Arc<ShardMetrics>,
    first: Command,
    rx: mpsc::Receiver<Command>,
    wake: std::os::unix::net::UnixStream,
) {
    let Command::Update { gen, sockets, done } = first else {
        tracing::error!(shard = id, "internal: a shard must start with a generation");
        return;
    };
    let shard = Rc::new(Shard {
        id,
        ktls: support,
        metrics: metrics.clone(),
        pipes: PipePool::default(),
        idle: Rc::new(IdleSweeper::default()),
        drain: DrainSignal::default(),
        current: RefCell::new(Rc::new(ShardGen::new(id, gen.clone(), &metrics, None))),
        accepting: RefCell::default(),
        accept_log: crate::clock::LogEvery::default(),
        client_log: crate::clock::LogEvery::default(),
        handshake_log: crate::clock::LogEvery::default(),
        peer_log: crate::clock::LogEvery::default(),
        refused_log: crate::clock::LogEvery::default(),
        ended_log: crate::clock::LogEvery::default(),
        upstream_ended_log: crate::clock::LogEvery::default(),
        proxy_header_log: crate::clock::LogEvery::default(),
    });
    set_thread_shard(id, metrics.clone());
    monoio::spawn(shard.idle.clone().run());
    monoio::spawn(trim_loop(shard.clone()));
    update(&shard, gen, sockets, done);
    let mut wake = match monoio::net::UnixStream::from_std(wake) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(shard = id, error = %e, "internal: cannot register the control socket");
            return;
        }
    };
    let mut buf = vec![0u8; 64];
    loop {
        use monoio::io::AsyncReadRent as _;
        let (res, b) = wake.read(buf).await;
        buf = b;
        match res {
            Ok(0) => return, // the control thread is gone: the process is exiting
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(shard = id, error = %e, "internal: control socket failed");
                return;
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            match cmd {
                Command::Update { gen, sockets, done } => update(&shard, gen, sockets, done),
                Command::Close { done } => {
                    shard.drain.start();
                    let _ = done.send(shard.current().gen.number);
                }
                Command::StopAccepting { done } => stop_accepting(&shard, done).await,
                Command::Cut { done } => {
                    shard.drain.cut();
                    let _ = done.send(shard.current().gen.number);
                }
            }
        }
    }
}

/// Connections that must have come and gone since the last trim before a
/// trim is worth its cost (it walks every arena).
const TRIM_AFTER_CONNECTIONS: u64 = 1024;

/// glibc keeps what a burst of connections freed in its per-thread arenas:
/// measured with `bench/soak.sh`, five floods of 5,000 half-open handshakes
/// left RSS at 210 MB with nothing open. Once a burst has ended (at least
/// [`TRIM_AFTER_CONNECTIONS`] accepted since the last trim, and open
/// connections at most half their peak since then), the shard trims the
/// heap, at most once per 5 s. The same once-a-second tick closes pooled
/// backend connections past their idle timeout.
async fn trim_loop(shard: Rc<Shard>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut since = shard.metrics.accepted.load(Relaxed);
    let mut peak = 0u64;
    let mut last = std::time::Instant::now();
    loop {
        monoio::time::sleep(std::time::Duration::from_secs(1)).await;
        // Idle backend connections past their pool_idle_timeout close
        // even in a group no request reaches any more.
        let gen = shard.current();
        let now = std::time::Instant::now();
        for (pool, upstream) in gen.pools.iter().zip(&gen.config().upstreams) {
            pool.evict_stale(upstream.pool_idle_timeout, now);
        }
        drop(gen);
        let active = shard.metrics.active.load(Relaxed);
        peak = peak.max(active);
        let accepted = shard.metrics.accepted.load(Relaxed);
        let ended = accepted.saturating_sub(since) >= TRIM_AFTER_CONNECTIONS && active <= peak / 2;
        if !ended || last.elapsed() < std::time::Duration::from_secs(5) {
            continue;
        }
        if !shard.current().config().runtime.memory_trim {
            continue;
        }
        let started = std::time::Instant::now();
        crate::sys::trim_heap();
        ShardMetrics::inc(&shard.metrics.memory_trims);
        tracing::debug!(shard = shard.id, took = ?started.elapsed(), peak, active, "heap trimmed after a burst");
        since = accepted;
        peak = active;
        last = std::time::Instant::now();
    }
}

/// Swaps in a generation (the shard's safe point: between two polls, so no
/// connection sees half of it) and starts and stops accept loops to match.
fn update(
    shard: &Rc<Shard>,
    gen: Arc<Generation>,
    sockets: Vec<(u64, std::net::TcpListener)>,
    done: mpsc::SyncSender<u64>,
) {
    let number = gen.number;
    let old = shard.current();
    let next = Rc::new(ShardGen::new(shard.id, gen, &shard.metrics, Some(&old)));
    let config = next.config();
    shard
        .idle
        .set_period(idle::sweep_period(swept_timeouts(config)));
    shard.current.replace(next.clone());
    if !Rc::ptr_eq(&old, &next) {
        // Pools of upstream groups removed or changed: idle backend
        // connections close now.
        for pool in &old.pools {
            if !next.pools.iter().any(|p| Rc::ptr_eq(p, pool)) {
                pool.retire();
            }
        }
        old.retired.set(Some(std::time::Instant::now()));
    }
    shard.accepting.borrow_mut().retain(|(key, stop)| {
        let keep = next.gen.slot(*key).is_some();
        if !keep {
            // Connections still queued on it are served with the
            // generation that had it.
            *stop.retired_gen.borrow_mut() = Some(old.clone());
            stop.stop();
        }
        keep
    });
    drop(old);
    for (key, std_listener) in sockets {
        match monoio::net::TcpListener::from_std(std_listener) {
            Ok(listener) => {
                let stop = Rc::new(AcceptStop::default());
                shard.accepting.borrow_mut().push((key, stop.clone()));
                monoio::spawn(accept_loop(shard.clone(), key, listener, stop));
            }
            Err(e) => {
                tracing::error!(shard = shard.id, error = %e, "internal: cannot register listener")
            }
        }
    }
    let _ = done.send(number);
}

async fn stop_accepting(shard: &Rc<Shard>, done: mpsc::SyncSender<u64>) {
    let stops: Vec<_> = shard.accepting.borrow_mut().drain(..).collect();
    for (_, stop) in &stops {
        stop.stop();
    }
    // Wait for each accept loop to take its queue and close its socket.
    for (_, stop) in stops {
        stop.closed().await;
    }
    let _ = done.send(shard.current().gen.number);
}

/// Stops one accept loop.
#[derive(Default)]
struct AcceptStop {
    /// The generation that last had this socket, once a newer one dropped
    /// it (connections taken from its queue are served with it).
    retired_gen: RefCell<Option<Rc<ShardGen>>>,
    canceller: RefCell<Option<monoio::io::Canceller>>,
    stopped: std::cell::Cell<bool>,
    closed: std::cell::Cell<bool>,
    waiter: RefCell<Option<std::task::Waker>>,
}

impl AcceptStop {
    fn handle(&self) -> monoio::io::CancelHandle {
        self.canceller
            .borrow_mut()
            .get_or_insert_with(monoio::io::Canceller::new)
            .handle()
    }

    fn stop(&self) {
        self.stopped.set(true);
        if let Some(c) = self.canceller.borrow_mut().take() {
            c.cancel();
        }
    }

    fn set_closed(&self) {
        self.closed.set(true);
        if let Some(w) = self.waiter.borrow_mut().take() {
            w.wake();
        }
    }

    async fn closed(&self) {
        std::future::poll_fn(|cx| {
            if self.closed.get() {
                return std::task::Poll::Ready(());
            }
            *self.waiter.borrow_mut() = Some(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await
    }
}

async fn accept_loop(
    shard: Rc<Shard>,
    key: u64,
    listener: monoio::net::TcpListener,
    stop: Rc<AcceptStop>,
) {
    while !stop.stopped.get() {
        match listener.cancelable_accept(stop.handle()).await {
            Ok((socket, peer)) => dispatch(&shard, key, &stop, socket, peer),
            Err(_) if stop.stopped.get() => break,
            Err(e) => {
                ShardMetrics::inc(&shard.metrics.accept_errors);
                let local = crate::upstream::is_local_exhaustion(&e);
                if local {
                    ShardMetrics::inc(&shard.metrics.local_exhaustion);
                }
                if let Some(count) = shard.accept_log.due() {
                    tracing::warn!(shard = shard.id, error = %e, count, "accept failed ({count} since the last such line; at most one line per 10 s)");
                }
                // Out of fds or memory: the queue waits in the kernel while
                // this shard backs off (nginx pauses accepting 500 ms);
                // anything else, briefly, so the loop never spins.
                let pause = if local { 100 } else { 20 };
                monoio::time::sleep(std::time::Duration::from_millis(pause)).await;
            }
        }
    }
    // Closing a listening socket resets every connection in its accept
    // queue, so take what is queued first.
    let mut taken = 0u32;
    loop {
        match socket2::SockRef::from(&crate::sys::borrow_fd(&listener)).accept() {
            Ok((socket, addr)) => {
                let Some(peer) = addr.as_socket() else {
                    continue;
                };
                let stream = std::net::TcpStream::from(socket);
                let _ = stream.set_nonblocking(true);
                match monoio::net::TcpStream::from_std(stream) {
                    Ok(s) => {
                        taken += 1;
                        dispatch(&shard, key, &stop, s, peer);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot register a queued connection"),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                tracing::warn!(shard = shard.id, error = %e, "accept failed while closing a listener");
                break;
            }
        }
    }
    tracing::debug!(shard = shard.id, key, taken, "listener closed");
    drop(listener);
    stop.retired_gen.borrow_mut().take();
    stop.set_closed();
}

fn dispatch(
    shard: &Rc<Shard>,
    key: u64,
    stop: &AcceptStop,
    socket: monoio::net::TcpStream,
    peer: SocketAddr,
) {
    // The current generation, or (for a socket being retired) the one
    // that had it.
    let current = shard.current();
    let found = match current.gen.slot(key) {
        Some(slot) => Some((current, slot)),
        None => stop
            .retired_gen
            .borrow()
            .as_ref()
            .and_then(|g| Some((g.clone(), g.gen.slot(key)?))),
    };
    let Some((gen, slot)) = found else {
        tracing::warn!(shard = shard.id, %peer, "internal: connection on a socket no generation serves");
        return;
    };
    match slot {
        Slot::Tls(index) => {
            if over_cap(shard, &gen, peer) {
                return;
            }
            let Ok(client) = driver::admit_at_accept(shard, &gen, index, peer) else {
                return;
            };
            let fut = driver::contained(driver::UntilCut::new(
                shard.clone(),
                driver::serve(shard.clone(), gen, index, socket, peer, client),
            ));
            tracing::trace!(bytes = std::mem::size_of_val(&fut), "connection task size");
            monoio::spawn(fut);
        }
        Slot::Redirect(r) => {
            // Counted and capped as TLS connections are: a plain-HTTP
            // listener is as public, and its connections hold fds too.
            if over_cap(shard, &gen, peer) {
                return;
            }
            let open = driver::Opened::new(shard.metrics.clone());
            let https_port = gen.config().redirects.get(r).and_then(|r| r.https_port);
            let work =
                crate::proxy::http::redirect::serve(socket, https_port, gen.gen.challenges.clone());
            monoio::spawn(driver::contained(driver::UntilCut::new(
                shard.clone(),
                async move {
                    let _open = open;
                    work.await
                },
            )));
        }
    }
}

/// Whether the shard is at `runtime.max_connections`: the connection is
/// then refused fast, closed before any work (counted, logged at debug);
/// served connections are unaffected.
fn over_cap(shard: &Shard, gen: &ShardGen, peer: SocketAddr) -> bool {
    let active = shard
        .metrics
        .active
        .load(std::sync::atomic::Ordering::Relaxed);
    if active < gen.config().runtime.max_connections {
        return false;
    }
    ShardMetrics::inc(&shard.metrics.refused_over_cap);
    tracing::debug!(shard = shard.id, %peer, active, "connection cap reached");
    true
}

/// Every timeout the shard's sweeper enforces: each route's idle timeout
/// and, for HTTP/1.1 (whose waits are bounded on the connection's sweeper
/// entry, `forward::Ctx::within`), the head, send and backend response
/// timeouts. The sweep period follows the shortest.
fn swept_timeouts(
    config: &crate::config::Config,
) -> impl Iterator<Item = std::time::Duration> + '_ {
    let http = config.listeners.iter().filter_map(|l| match &l.route {
        crate::config::Route::Http(h) => Some(h),
        _ => None,
    });
    let any_http = http.clone().next().is_some();
    config
        .listeners
        .iter()
        .map(|l| l.route.idle_timeout())
        .chain(http.flat_map(|h| [h.head_timeout, h.send_timeout]))
        .chain(
            config
                .upstreams
                .iter()
                .filter(move |_| any_http)
                .map(|u| u.response_timeout),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_connections_inherit_tcp_nodelay_from_the_listener() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "the listener's TCP_NODELAY was not inherited"
        );

        // A listener bound without it (as an older ktern's, handed over by
        // a binary upgrade) gets it from `no_nagle`.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(plain.local_addr().unwrap()).unwrap();
        let (before, _) = plain.accept().unwrap();
        assert!(!before.nodelay().unwrap());
        no_nagle(&plain).unwrap();
        let _client = std::net::TcpStream::connect(plain.local_addr().unwrap()).unwrap();
        let (after, _) = plain.accept().unwrap();
        assert!(after.nodelay().unwrap());
    }
}
