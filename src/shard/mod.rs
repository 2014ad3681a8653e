//! Per-core shards: one thread per CPU, pinned with `core_affinity`, each
//! with its own monoio runtime (io_uring, or the legacy epoll driver) and its
//! own `SO_REUSEPORT` socket per listener, so the kernel spreads connections
//! over shards and nothing on the connection path is shared between threads.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context as _;
use rustls::ServerConfig;
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{Config, Driver, Route};
use crate::metrics::ShardMetrics;
use crate::proxy::idle::{self, IdleSweeper};
use crate::proxy::tcp::PipePool;
use crate::upstream::Balancer;

pub mod driver;

/// Everything one shard's connections read. Lives on the shard's thread.
pub struct Shard {
    /// Shard index (0-based).
    pub id: usize,
    /// The validated config.
    pub config: Arc<Config>,
    /// rustls server config per listener (own session cache per shard).
    pub tls: Vec<Arc<ServerConfig>>,
    /// Backend choice per listener (`tcp` routes; empty for `http`).
    pub balancers: Vec<Balancer>,
    /// Backend choice per upstream group (`http` routes).
    pub upstream_balancers: Vec<Balancer>,
    /// Idle keep-alive connections per upstream group.
    pub pool: crate::upstream::pool::Pool,
    /// kTLS capabilities probed at start.
    pub ktls: Arc<crate::ktls::Support>,
    /// This shard's counters.
    pub metrics: Arc<ShardMetrics>,
    /// Pipes for splice, reused across connections.
    pub pipes: PipePool,
    /// Idle-timeout entries, swept by one task per shard.
    pub idle: Rc<IdleSweeper>,
}

/// A running shard.
pub struct ShardHandle {
    /// The shard's thread.
    pub thread: JoinHandle<()>,
    /// Its counters.
    pub metrics: Arc<ShardMetrics>,
}

/// Creates one listening socket: `SO_REUSEADDR` (restart while old
/// connections sit in TIME_WAIT), `SO_REUSEPORT` (one socket per shard on the
/// same address; the kernel hashes each new connection to one of them).
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
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

/// Binds every listener once per shard (so address errors surface before any
/// thread starts), then starts the shards. Returns the handles and the bound
/// address of each listener (port 0 in the config becomes a real port, the
/// same for every shard).
pub fn start(config: Arc<Config>, support: Arc<crate::ktls::Support>) -> anyhow::Result<Started> {
    let cpus = shard_cpus(&config);
    // TLS listeners first, then the plain-HTTP redirect listeners.
    let mut bound: Vec<SocketAddr> = config
        .listeners
        .iter()
        .map(|l| l.address)
        .chain(config.redirects.iter().map(|r| r.address))
        .collect();
    let mut sockets: Vec<Vec<std::net::TcpListener>> = Vec::new();
    for _ in &cpus {
        let mut per_shard = Vec::new();
        for (i, l) in config.listeners.iter().enumerate() {
            let s = bind(bound[i], l.backlog)
                .with_context(|| format!("listener {:?}: cannot listen on {}", l.name, bound[i]))?;
            bound[i] = s.local_addr()?;
            per_shard.push(s);
        }
        for addr in bound.iter_mut().skip(config.listeners.len()) {
            let s =
                bind(*addr, 4096).with_context(|| format!("redirect: cannot listen on {addr}"))?;
            *addr = s.local_addr()?;
            per_shard.push(s);
        }
        sockets.push(per_shard);
    }
    let use_uring = match config.runtime.driver {
        Driver::Legacy => false,
        Driver::IoUring => true,
        Driver::Auto => monoio::utils::detect_uring(),
    };
    if !use_uring {
        tracing::warn!(
            "io_uring unavailable or disabled: shards use monoio's legacy (epoll) driver"
        );
    }
    let checks = crate::upstream::health::start(&config)
        .context("cannot start the health checker thread")?;
    let health = Arc::new(checks.states);
    let mut handles = Vec::new();
    for (id, (cpu, listeners)) in cpus.into_iter().zip(sockets).enumerate() {
        let health = health.clone();
        let metrics = Arc::new(ShardMetrics::default());
        let shard_metrics = metrics.clone();
        let config = config.clone();
        let support = support.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ktern-shard-{id}"))
            .spawn(move || {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                    tracing::warn!(shard = id, cpu, "could not pin shard thread to its CPU");
                }
                let run = shard_main(
                    id,
                    config.clone(),
                    support,
                    shard_metrics,
                    listeners,
                    health,
                );
                let entries = config.runtime.uring_entries;
                let res = if use_uring {
                    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                        .with_entries(entries)
                        .enable_timer()
                        .build()
                        .map(|mut rt| rt.block_on(run))
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
        handles.push(ShardHandle { thread, metrics });
    }
    let metrics = handles
        .iter()
        .map(|h| h.metrics.clone())
        .chain(checks.metrics)
        .collect();
    Ok(Started {
        shards: handles,
        bound,
        metrics,
    })
}

/// What [`start`] started.
pub struct Started {
    /// One per shard.
    pub shards: Vec<ShardHandle>,
    /// The bound address of each listener, then of each redirect listener.
    pub bound: Vec<SocketAddr>,
    /// Every counter set to sum on the admin endpoint (shards, health checker).
    pub metrics: Vec<Arc<ShardMetrics>>,
}

async fn shard_main(
    id: usize,
    config: Arc<Config>,
    support: Arc<crate::ktls::Support>,
    metrics: Arc<ShardMetrics>,
    listeners: Vec<std::net::TcpListener>,
    health: Arc<Vec<Option<Arc<crate::upstream::HealthState>>>>,
) {
    let mut tls = Vec::new();
    let mut balancers = Vec::new();
    for l in &config.listeners {
        match crate::handshake::server_config(l) {
            Ok(c) => tls.push(c),
            Err(e) => {
                tracing::error!(shard = id, listener = %l.name, error = %e, "internal: TLS config rejected");
                return;
            }
        }
        balancers.push(match &l.route {
            Route::Tcp(t) => Balancer::new(t.backends.clone(), id),
            Route::Http(_) => Balancer::new(Vec::new(), id),
        });
    }
    let upstream_balancers = config
        .upstreams
        .iter()
        .zip(health.iter())
        .map(|(u, h)| Balancer::for_upstream(u, id, h.clone()))
        .collect();
    let pool = crate::upstream::pool::Pool::new(config.upstreams.len());
    let shard = Rc::new(Shard {
        id,
        upstream_balancers,
        pool,
        config,
        tls,
        balancers,
        ktls: support,
        metrics,
        pipes: PipePool::default(),
        idle: Rc::new(IdleSweeper::default()),
    });
    let period = idle::sweep_period(
        shard
            .config
            .listeners
            .iter()
            .map(|l| l.route.idle_timeout()),
    );
    monoio::spawn(shard.idle.clone().run(period));
    let mut accept_loops = Vec::new();
    for (index, std_listener) in listeners.into_iter().enumerate() {
        let listener = match monoio::net::TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(shard = id, error = %e, "cannot register listener");
                return;
            }
        };
        let shard = shard.clone();
        match index.checked_sub(shard.config.listeners.len()) {
            None => accept_loops.push(monoio::spawn(accept_loop(shard, index, listener))),
            Some(r) => {
                let https_port = shard.config.redirects[r].https_port;
                accept_loops.push(monoio::spawn(redirect_loop(listener, https_port)));
            }
        }
    }
    for h in accept_loops {
        h.await;
    }
}

async fn accept_loop(shard: Rc<Shard>, index: usize, listener: monoio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok((socket, peer)) => {
                let active = shard
                    .metrics
                    .active
                    .load(std::sync::atomic::Ordering::Relaxed);
                if active >= shard.config.runtime.max_connections {
                    // Refused fast: closed before any TLS work; served
                    // connections are unaffected.
                    crate::metrics::ShardMetrics::inc(&shard.metrics.refused_over_cap);
                    tracing::debug!(shard = shard.id, %peer, active, "connection cap reached");
                    drop(socket);
                    continue;
                }
                let fut = driver::serve(shard.clone(), index, socket, peer);
                tracing::trace!(bytes = std::mem::size_of_val(&fut), "connection task size");
                monoio::spawn(fut);
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off briefly instead of spinning.
                tracing::warn!(shard = shard.id, error = %e, "accept failed");
                monoio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

async fn redirect_loop(listener: monoio::net::TcpListener, https_port: Option<u16>) {
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                monoio::spawn(crate::proxy::http::redirect::serve(socket, https_port));
            }
            Err(e) => {
                tracing::warn!(error = %e, "redirect accept failed");
                monoio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}
